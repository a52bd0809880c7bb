"""The virtual trial (issue 12): many subjects over visits at sites, from the real heads of ../shared/data.

scanner     a virtual scanner: a real head made into a new subject, written as a vendor writes a T1
"""

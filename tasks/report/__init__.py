"""Stage: what the people running a trial read, from the lake's tables (after qc).

status       the trial's state per site and visit (pure functions of the tables)
sites_page   the site dashboard, reports/sites.html (self-contained HTML)
qc_page      a QC review page per processed series, reports/qc/<series>.html
"""

"""ComBat harmonization across sites (neuroHarmonize), model store and report."""

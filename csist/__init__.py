"""The product command line (`csist`) and the detector stand-in (`csist replay`)."""

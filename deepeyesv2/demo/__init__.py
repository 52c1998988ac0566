"""`deepeyesv2 demo`: the counting task, its scripted expert, and the example data sets made from it."""

"""`noiserefine report`: the papers' evidence regenerated on the embedded world (see report.core)."""

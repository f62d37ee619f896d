"""Guided diffusion quality at unguided cost: NoiseRefine, Golden Noise and Noise Diffusion.

The library logs to the `noiserefine` logger, which has only a NullHandler here (the library
convention); the command line shows it on stderr at the level of --verbose / --quiet.
"""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

"""Initial-noise methods: NoiseRefine, Golden Noise (NPNet), Noise Diffusion, best-of-N."""

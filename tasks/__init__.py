"""Stage command lines: `python -m tasks.<stage>`, each a thin CLI over latent_sft_core (see dvc.yaml)."""

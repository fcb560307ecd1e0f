"""Build time: export, optimise, quantise and gate models into bundles. Needs medc[build] (torch, transformers)."""

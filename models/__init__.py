"""Trained artefacts shipped with edge-adapt (installed as `edge_adapt.models`): see README.md here."""

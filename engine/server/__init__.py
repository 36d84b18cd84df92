"""The MambaHoME HTTP server: one GPU, many light clients (3D Slicer, napari on a laptop).

A client sends a volume once into a session, then asks for automatic segmentation or sends
interactive prompts and gets back only the changed bounding box; it can save corrected cases and
start a fine-tune job. :func:`engine.server.app.create_app` builds the FastAPI app;
``mambahome serve`` runs it with uvicorn. The wire format lives in :mod:`mambahome_client.wire`.
"""
from engine.server.config import ServerConfig, ServerConfigError

__all__ = ["ServerConfig", "ServerConfigError"]

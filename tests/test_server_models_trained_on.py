"""``GET /models`` lists ``modalities_seen`` (the bundled default: CT and MR) beside ``modality`` (only its default
intensity rule), so the napari Model section and other clients say "trained on: CT, MR" for a server's model too.
A real server on localhost."""
from __future__ import annotations

import pytest


def test_the_servers_model_listing_says_what_each_model_was_trained_on(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_support import connected_client, cpu_server

    with cpu_server(tmp_path, "listing-token-123456") as (url, _app):
        listing = connected_client(url, "listing-token-123456").models()
    from napari_mambahome.remote import entries_from_listing

    default = next(m for m in listing["models"] if m["task"] != "interactive")
    assert default["modality"] == "MR" and default["modalities_seen"] == ["CT", "MR"], default
    entry = next(e for e in entries_from_listing(listing, url) if e.model_id == default["id"])
    assert "trained on: CT, MR" in entry.summary()

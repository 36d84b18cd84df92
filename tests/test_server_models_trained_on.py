"""``GET /models`` lists ``modalities_seen`` (the bundled default: CT and MR) beside ``modality`` (only its default
intensity rule), and whether a model learnt from synthetic phantoms alone, so the napari Model section and the
Slicer module say "trained on: CT, MR synthetic phantoms only" for a server's model too. A real server on
localhost."""
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
    entries = {e.model_id: e for e in entries_from_listing(listing, url)}
    entry = entries[default["id"]]
    assert "trained on: CT, MR synthetic phantoms only: a demo model that knows no real anatomy" in entry.summary()
    # as the same checkpoint read here says it
    from napari_mambahome._models import read_entry

    local = read_entry(_app.state.models.get(default["id"]).path)
    assert local.trained_on() == entry.trained_on() and local.training_data() == entry.training_data()
    assert default["phantoms_only"] is True and default["training_cases"]["real"] == 0
    # the bundled promptable model learnt from real scans and phantoms: counted, not called a demo
    promptable = next(m for m in listing["models"] if m["task"] == "interactive")
    assert promptable["phantoms_only"] is False and promptable["training_cases"]["real"] > 0
    assert "real scans and" in entries[promptable["id"]].trained_on()
    # a server that lists no such field (older ones): no claim either way
    old = {"models": [{k: v for k, v in default.items() if k not in ("phantoms_only", "training_cases")}]}
    assert "phantoms" not in entries_from_listing(old, url)[0].trained_on()


def test_the_slicer_model_lists_mark_a_phantom_demo_model(tmp_path):
    """The Slicer module's model lists read the same field: a demo model is marked where the user chooses it."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_support import connected_client, cpu_server
    from slicer_support import load_module

    mod = load_module()
    with cpu_server(tmp_path, "listing-token-123456") as (url, _app):
        listing = connected_client(url, "listing-token-123456").models()
    labels = {m["id"]: mod.model_label(m) for m in listing["models"]}
    default = next(m for m in listing["models"] if m["task"] != "interactive")
    promptable = next(m for m in listing["models"] if m["task"] == "interactive")
    assert labels[default["id"]] == f"{default['id']} ({default['version']}), demo: synthetic phantoms only"
    assert labels[promptable["id"]] == f"{promptable['id']} ({promptable['version']})"


def test_a_demo_model_fine_tuned_on_scans_is_listed_with_the_scans_it_learnt(tmp_path):
    """A demo model of phantoms fine-tuned on a real scan knows that scan and nothing real beyond it: the server lists
    how many scans it learnt since the demo (it read as a model of real CT and MR), and the napari Model section and
    the Slicer model lists say so as the same checkpoint read locally does."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_support import connected_client, cpu_server
    from slicer_support import load_module
    from test_napari_model_honesty import _checkpoint

    from napari_mambahome._models import read_entry
    from napari_mambahome.remote import entries_from_listing

    models = tmp_path / "server" / "models"
    models.mkdir(parents=True)
    demo = _checkpoint(models / "demo.safetensors", ["phantom_000", "phantom_001"])
    tuned = _checkpoint(models / "tuned.safetensors", ["case_001", "case_002"],
                        parent={"version": "demo", "path": str(demo), "sha256": "0" * 64})
    with cpu_server(tmp_path / "server", "listing-token-123456") as (url, _app):
        listing = connected_client(url, "listing-token-123456").models()
    records = {m["version"]: m for m in listing["models"]}
    assert records["tuned"]["real_scans_since_demo"] == 2 and records["tuned"]["phantoms_only"] is False
    assert records["demo"]["real_scans_since_demo"] is None
    entries = {e.metadata["version"]: e for e in entries_from_listing(listing, url)}
    assert entries["tuned"].trained_on() == read_entry(tuned).trained_on()
    assert "fine-tuned on 2 real scans from a demo model" in entries["tuned"].trained_on()
    mod = load_module()
    assert mod.model_label(records["tuned"]).endswith(", demo fine-tuned on 2 real scans")
    assert mod.model_label(records["demo"]).endswith(", demo: synthetic phantoms only")

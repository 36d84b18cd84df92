"""The first engine import of a napari session (Start prompting, Segment): the objects the import made are not walked
by one long collection right after it (it held the GIL 0.35-0.43 s on the 2-core annotator machine, measured with a
worker doing what Start prompting's does while the main thread ticked).
"""
from __future__ import annotations

import gc


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


def test_objects_made_with_the_collector_off_leave_the_young_generation_untraversed_and_unfrozen():
    from napari_mambahome._jobs import no_full_collections

    assert gc.isenabled()
    with no_full_collections():
        made = [_Node() for _ in range(5000)]
        assert not gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0  # nothing stays frozen
    young = {id(o) for o in gc.get_objects(generation=0)} | {id(o) for o in gc.get_objects(generation=1)}
    assert not any(id(o) in young for o in made)  # no young collection has all of them to walk
    marker = made[0]
    assert any(o is marker for o in gc.get_objects(generation=2))
    dropped = id(made[-1])
    del made, marker
    gc.collect()
    assert not any(id(o) == dropped and isinstance(o, _Node) for o in gc.get_objects())  # still collectable

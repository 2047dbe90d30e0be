"""The garbage collector in a long-lived worker.

CPython's cyclic collector runs a full (generation 2) collection whenever the objects that
survived into generation 2 since the last one reach a quarter of those it found there. A
worker's heap is mostly what it built at start and keeps to the end: imported modules
(pandas, River, faust, aiokafka), the spec, the model. A batch's messages live long enough
to be promoted, so full collections come every second or so under load, and each walked
the whole start-up heap to free nothing: 98-117 ms with the event loop blocked, about 8 in
a 7 s backlog of ``bench/e2e.py --systems weir-score`` (issue #12; measured with
``gc.callbacks``).

:func:`freeze_startup_heap` moves what is alive once the process is set up into the
collector's permanent generation (``gc.freeze``, what the CPython docs advise for a
pre-forked server), so later full collections walk only what came after. The frozen
objects are still freed by reference counting; only reference cycles among them, which
a process does not make of its start-up state, would be kept.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then exempt every object alive now from later collections.

    Call it once the process is set up (modules imported, model loaded), before its main
    loop. Returns how many objects are frozen in all (``gc.get_freeze_count``).

    Examples:
        >>> freeze_startup_heap() > 0
        True
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

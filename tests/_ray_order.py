"""Test helper: Ray Data reads in a deterministic block order for the duration of a ``with`` block."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def preserve_order():
    """Set ``DataContext.execution_options.preserve_order`` on the driver, restoring the previous value after (the
    context is process-global and shared by every test of the session)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    old, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = old

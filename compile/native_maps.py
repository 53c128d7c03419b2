"""Model calls that calibrate their own output: muse.calib's kernel, compiled as a C
function, called by the native call path right after the model, on the same thread and
without the GIL.  In the server that takes calibration off the event loop entirely when a
batch runs on the model thread, and spares the Numba dispatch (~10 us a request, measured
with bench/request_path.py) when it runs on the loop."""

from __future__ import annotations

from muse.calib import MapTable
from muse.calib.kernels import GRID_SIZE, calibrate_rows_c

from ._library import NativeMapTable


def native_map_table(table: MapTable) -> NativeMapTable:
    """The native handle of a map table (it keeps the table's arrays alive)."""
    return NativeMapTable(calibrate_rows_c.address, table.offsets, table.knots, table.grids, GRID_SIZE + 1)

"""Pure-Python client of the MambaHoME server (numpy and the standard library only, no torch).

Used by the 3D Slicer module and by napari when the model runs on another machine::

    from mambahome_client import Client
    c = Client("http://127.0.0.1:8765", token=None); c.connect()
    s = c.upload_file("ct.nii.gz"); seg = c.segment(s.session_id)
"""
from .client import (AuthError, BusyError, Client, MaskUpdate, NotFoundError, PayloadTooLargeError,
                     ProtocolMismatchError, Segmentation, ServerError, ServerTimeoutError, ServerUnavailableError,
                     SessionChangedError, SessionInfo, TooManyVoxelsError)
from .wire import PROTOCOL_VERSION, PackError, pack_array, unpack_array

__all__ = [
    "AuthError", "BusyError", "Client", "MaskUpdate", "NotFoundError", "PayloadTooLargeError",
    "ProtocolMismatchError", "Segmentation", "ServerError", "ServerTimeoutError", "ServerUnavailableError",
    "SessionChangedError", "SessionInfo", "TooManyVoxelsError",
    "PROTOCOL_VERSION", "PackError", "pack_array", "unpack_array",
]

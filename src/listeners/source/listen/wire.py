"""The raw protobuf classes of the Listen RPC (proto-plus wrappers cost a copy per message)."""

from __future__ import annotations

from typing import Any

from google.cloud.firestore_v1.types import firestore as _firestore
from google.cloud.firestore_v1.types import query as _query

ListenRequest: Any = _firestore.ListenRequest.pb()
ListenResponse: Any = _firestore.ListenResponse.pb()
Target: Any = _firestore.Target.pb()
TargetChange: Any = _firestore.TargetChange.pb()
StructuredQuery: Any = _query.StructuredQuery.pb()

NO_CHANGE = 0
ADD = 1
REMOVE = 2
CURRENT = 3
RESET = 4

LISTEN_METHOD = "/google.firestore.v1.Firestore/Listen"

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RecordTop(_message.Message):
    __slots__ = ("data_type", "timestamp", "data")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data_type: int
    timestamp: int
    data: bytes
    def __init__(self, data_type: _Optional[int] = ..., timestamp: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class RecordTopBatch(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[RecordTop]
    def __init__(self, records: _Optional[_Iterable[_Union[RecordTop, _Mapping]]] = ...) -> None: ...

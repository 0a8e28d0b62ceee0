from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PackagedData(_message.Message):
    __slots__ = ("records", "agent_id", "intranet_ipv4", "extranet_ipv4", "intranet_ipv6", "extranet_ipv6", "hostname", "version", "product")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    INTRANET_IPV4_FIELD_NUMBER: _ClassVar[int]
    EXTRANET_IPV4_FIELD_NUMBER: _ClassVar[int]
    INTRANET_IPV6_FIELD_NUMBER: _ClassVar[int]
    EXTRANET_IPV6_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[EncodedRecord]
    agent_id: str
    intranet_ipv4: _containers.RepeatedScalarFieldContainer[str]
    extranet_ipv4: _containers.RepeatedScalarFieldContainer[str]
    intranet_ipv6: _containers.RepeatedScalarFieldContainer[str]
    extranet_ipv6: _containers.RepeatedScalarFieldContainer[str]
    hostname: str
    version: str
    product: str
    def __init__(self, records: _Optional[_Iterable[_Union[EncodedRecord, _Mapping]]] = ..., agent_id: _Optional[str] = ..., intranet_ipv4: _Optional[_Iterable[str]] = ..., extranet_ipv4: _Optional[_Iterable[str]] = ..., intranet_ipv6: _Optional[_Iterable[str]] = ..., extranet_ipv6: _Optional[_Iterable[str]] = ..., hostname: _Optional[str] = ..., version: _Optional[str] = ..., product: _Optional[str] = ...) -> None: ...

class EncodedRecord(_message.Message):
    __slots__ = ("data_type", "timestamp", "data")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data_type: int
    timestamp: int
    data: bytes
    def __init__(self, data_type: _Optional[int] = ..., timestamp: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("data_type", "timestamp", "data")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    data_type: int
    timestamp: int
    data: Payload
    def __init__(self, data_type: _Optional[int] = ..., timestamp: _Optional[int] = ..., data: _Optional[_Union[Payload, _Mapping]] = ...) -> None: ...

class Payload(_message.Message):
    __slots__ = ("fields",)
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    fields: _containers.ScalarMap[str, str]
    def __init__(self, fields: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("agent_ctrl", "task", "configs")
    AGENT_CTRL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    CONFIGS_FIELD_NUMBER: _ClassVar[int]
    agent_ctrl: int
    task: Task
    configs: _containers.RepeatedCompositeFieldContainer[Config]
    def __init__(self, agent_ctrl: _Optional[int] = ..., task: _Optional[_Union[Task, _Mapping]] = ..., configs: _Optional[_Iterable[_Union[Config, _Mapping]]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("data_type", "object_name", "data", "token")
    DATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    OBJECT_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    data_type: int
    object_name: str
    data: str
    token: str
    def __init__(self, data_type: _Optional[int] = ..., object_name: _Optional[str] = ..., data: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("name", "type", "version", "sha256", "signature", "download_urls", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_URLS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    version: str
    sha256: str
    signature: str
    download_urls: _containers.RepeatedScalarFieldContainer[str]
    detail: str
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., version: _Optional[str] = ..., sha256: _Optional[str] = ..., signature: _Optional[str] = ..., download_urls: _Optional[_Iterable[str]] = ..., detail: _Optional[str] = ...) -> None: ...

class FileUploadRequest(_message.Message):
    __slots__ = ("token", "data")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    token: str
    data: bytes
    def __init__(self, token: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class FileUploadResponse(_message.Message):
    __slots__ = ("status",)
    class StatusCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SUCCESS: _ClassVar[FileUploadResponse.StatusCode]
        FAILED: _ClassVar[FileUploadResponse.StatusCode]
    SUCCESS: FileUploadResponse.StatusCode
    FAILED: FileUploadResponse.StatusCode
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: FileUploadResponse.StatusCode
    def __init__(self, status: _Optional[_Union[FileUploadResponse.StatusCode, str]] = ...) -> None: ...

from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelHoldings(_message.Message):
    __slots__ = ("fingerprint", "layers", "experts", "checksums_sha256")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_SHA256_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    checksums_sha256: str
    def __init__(self, fingerprint: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[int]] = ..., checksums_sha256: _Optional[str] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "name", "version", "protocol_version", "models", "cache_budget_bytes", "cache_used_bytes", "disk_free_bytes", "backend", "unix_time")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    UNIX_TIME_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    name: str
    version: str
    protocol_version: int
    models: _containers.RepeatedCompositeFieldContainer[ModelHoldings]
    cache_budget_bytes: int
    cache_used_bytes: int
    disk_free_bytes: int
    backend: str
    unix_time: float
    def __init__(self, node_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelHoldings, _Mapping]]] = ..., cache_budget_bytes: _Optional[int] = ..., cache_used_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., backend: _Optional[str] = ..., unix_time: _Optional[float] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("fingerprint", "config_json", "layers_json")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    LAYERS_JSON_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    config_json: bytes
    layers_json: bytes
    def __init__(self, fingerprint: _Optional[str] = ..., config_json: _Optional[bytes] = ..., layers_json: _Optional[bytes] = ...) -> None: ...

class PushChunk(_message.Message):
    __slots__ = ("model", "layer", "expert", "checksum", "record_bytes", "offset", "data")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    layer: int
    expert: int
    checksum: str
    record_bytes: int
    offset: int
    data: bytes
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., layer: _Optional[int] = ..., expert: _Optional[int] = ..., checksum: _Optional[str] = ..., record_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("experts_stored", "errors")
    EXPERTS_STORED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    experts_stored: int
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, experts_stored: _Optional[int] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ComputeRequest(_message.Message):
    __slots__ = ("request_id", "fingerprint", "layer", "hidden", "rows", "experts", "sort")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    fingerprint: str
    layer: int
    hidden: Tensor
    rows: _containers.RepeatedScalarFieldContainer[int]
    experts: _containers.RepeatedScalarFieldContainer[int]
    sort: bool
    def __init__(self, request_id: _Optional[int] = ..., fingerprint: _Optional[str] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., rows: _Optional[_Iterable[int]] = ..., experts: _Optional[_Iterable[int]] = ..., sort: _Optional[bool] = ...) -> None: ...

class ComputeReply(_message.Message):
    __slots__ = ("request_id", "output", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    output: Tensor
    error: str
    def __init__(self, request_id: _Optional[int] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

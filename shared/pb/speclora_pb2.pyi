from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_DETAILED: _ClassVar[Mode]
    MODE_FAST: _ClassVar[Mode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_GRAMMAR_INCOMPLETE: _ClassVar[FinishReason]

class EvaluationPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVALUATION_PHASE_UNSPECIFIED: _ClassVar[EvaluationPhase]
    EVALUATION_PHASE_BEFORE: _ClassVar[EvaluationPhase]
    EVALUATION_PHASE_AFTER: _ClassVar[EvaluationPhase]

class TrainingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_STATE_UNSPECIFIED: _ClassVar[TrainingState]
    TRAINING_STATE_IDLE: _ClassVar[TrainingState]
    TRAINING_STATE_RUNNING: _ClassVar[TrainingState]
    TRAINING_STATE_FAILED: _ClassVar[TrainingState]

class Blas(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BLAS_UNSPECIFIED: _ClassVar[Blas]
    BLAS_REFERENCE: _ClassVar[Blas]
    BLAS_OPENBLAS: _ClassVar[Blas]
    BLAS_MKL: _ClassVar[Blas]
    BLAS_ACCELERATE: _ClassVar[Blas]

class AdapterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_STATUS_UNSPECIFIED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_PROMOTED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_REJECTED: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_CORRUPT: _ClassVar[AdapterStatus]
    ADAPTER_STATUS_BASE: _ClassVar[AdapterStatus]
MODE_UNSPECIFIED: Mode
MODE_DETAILED: Mode
MODE_FAST: Mode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_GRAMMAR_INCOMPLETE: FinishReason
EVALUATION_PHASE_UNSPECIFIED: EvaluationPhase
EVALUATION_PHASE_BEFORE: EvaluationPhase
EVALUATION_PHASE_AFTER: EvaluationPhase
TRAINING_STATE_UNSPECIFIED: TrainingState
TRAINING_STATE_IDLE: TrainingState
TRAINING_STATE_RUNNING: TrainingState
TRAINING_STATE_FAILED: TrainingState
BLAS_UNSPECIFIED: Blas
BLAS_REFERENCE: Blas
BLAS_OPENBLAS: Blas
BLAS_MKL: Blas
BLAS_ACCELERATE: Blas
ADAPTER_STATUS_UNSPECIFIED: AdapterStatus
ADAPTER_STATUS_PROMOTED: AdapterStatus
ADAPTER_STATUS_REJECTED: AdapterStatus
ADAPTER_STATUS_CORRUPT: AdapterStatus
ADAPTER_STATUS_BASE: AdapterStatus

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "raw", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "draft_tokens", "mode", "record", "request_id", "use_history", "json_schema", "json_object", "regex", "lark")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    USE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    JSON_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    JSON_OBJECT_FIELD_NUMBER: _ClassVar[int]
    REGEX_FIELD_NUMBER: _ClassVar[int]
    LARK_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    raw: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    draft_tokens: int
    mode: Mode
    record: bool
    request_id: str
    use_history: bool
    json_schema: str
    json_object: bool
    regex: str
    lark: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., raw: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., draft_tokens: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., record: _Optional[bool] = ..., request_id: _Optional[str] = ..., use_history: _Optional[bool] = ..., json_schema: _Optional[str] = ..., json_object: _Optional[bool] = ..., regex: _Optional[str] = ..., lark: _Optional[str] = ...) -> None: ...

class TextChunk(_message.Message):
    __slots__ = ("text", "token_ids", "from_draft", "from_history", "from_grammar")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    FROM_HISTORY_FIELD_NUMBER: _ClassVar[int]
    FROM_GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    from_draft: _containers.RepeatedScalarFieldContainer[bool]
    from_history: _containers.RepeatedScalarFieldContainer[bool]
    from_grammar: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., from_draft: _Optional[_Iterable[bool]] = ..., from_history: _Optional[_Iterable[bool]] = ..., from_grammar: _Optional[_Iterable[bool]] = ...) -> None: ...

class GenerationSummary(_message.Message):
    __slots__ = ("request_id", "prompt_tokens", "completion_tokens", "proposed", "accepted", "acceptance_rate", "tokens_per_second", "time_to_first_token_s", "finish_reason", "adapter_version", "failure_recorded", "target_passes", "tokens_per_step", "mode", "total_time_s", "cached_prompt_tokens", "draft_proposed", "draft_accepted", "history_proposed", "history_accepted", "grammar_proposed", "grammar_accepted")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_RECORDED_FIELD_NUMBER: _ClassVar[int]
    TARGET_PASSES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TIME_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    proposed: int
    accepted: int
    acceptance_rate: float
    tokens_per_second: float
    time_to_first_token_s: float
    finish_reason: FinishReason
    adapter_version: str
    failure_recorded: bool
    target_passes: int
    tokens_per_step: float
    mode: Mode
    total_time_s: float
    cached_prompt_tokens: int
    draft_proposed: int
    draft_accepted: int
    history_proposed: int
    history_accepted: int
    grammar_proposed: int
    grammar_accepted: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., time_to_first_token_s: _Optional[float] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., adapter_version: _Optional[str] = ..., failure_recorded: _Optional[bool] = ..., target_passes: _Optional[int] = ..., tokens_per_step: _Optional[float] = ..., mode: _Optional[_Union[Mode, str]] = ..., total_time_s: _Optional[float] = ..., cached_prompt_tokens: _Optional[int] = ..., draft_proposed: _Optional[int] = ..., draft_accepted: _Optional[int] = ..., history_proposed: _Optional[int] = ..., history_accepted: _Optional[int] = ..., grammar_proposed: _Optional[int] = ..., grammar_accepted: _Optional[int] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("chunk", "summary")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk: TextChunk
    summary: GenerationSummary
    def __init__(self, chunk: _Optional[_Union[TextChunk, _Mapping]] = ..., summary: _Optional[_Union[GenerationSummary, _Mapping]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("steps", "max_cases", "learning_rate", "force_promote", "max_train_s")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_CASES_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    FORCE_PROMOTE_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    steps: int
    max_cases: int
    learning_rate: float
    force_promote: bool
    max_train_s: float
    def __init__(self, steps: _Optional[int] = ..., max_cases: _Optional[int] = ..., learning_rate: _Optional[float] = ..., force_promote: _Optional[bool] = ..., max_train_s: _Optional[float] = ...) -> None: ...

class TrainStarted(_message.Message):
    __slots__ = ("train_cases", "heldout_cases", "steps", "parent_version")
    TRAIN_CASES_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_CASES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    train_cases: int
    heldout_cases: int
    steps: int
    parent_version: str
    def __init__(self, train_cases: _Optional[int] = ..., heldout_cases: _Optional[int] = ..., steps: _Optional[int] = ..., parent_version: _Optional[str] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "tokens_per_second", "base_loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BASE_LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    tokens_per_second: float
    base_loss: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., base_loss: _Optional[float] = ...) -> None: ...

class TrainEvaluation(_message.Message):
    __slots__ = ("phase_name", "heldout_acceptance", "phase")
    PHASE_NAME_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    phase_name: str
    heldout_acceptance: float
    phase: EvaluationPhase
    def __init__(self, phase_name: _Optional[str] = ..., heldout_acceptance: _Optional[float] = ..., phase: _Optional[_Union[EvaluationPhase, str]] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("adapter_version", "promoted", "reason", "acceptance_before", "acceptance_after", "duration_s", "trigger")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    trigger: str
    def __init__(self, adapter_version: _Optional[str] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ..., acceptance_before: _Optional[float] = ..., acceptance_after: _Optional[float] = ..., duration_s: _Optional[float] = ..., trigger: _Optional[str] = ...) -> None: ...

class TrainEvent(_message.Message):
    __slots__ = ("started", "progress", "evaluation", "result")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    started: TrainStarted
    progress: TrainProgress
    evaluation: TrainEvaluation
    result: TrainResult
    def __init__(self, started: _Optional[_Union[TrainStarted, _Mapping]] = ..., progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., evaluation: _Optional[_Union[TrainEvaluation, _Mapping]] = ..., result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("watch", "interval_s")
    WATCH_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    watch: bool
    interval_s: float
    def __init__(self, watch: _Optional[bool] = ..., interval_s: _Optional[float] = ...) -> None: ...

class AdapterAcceptance(_message.Message):
    __slots__ = ("adapter_version", "requests", "proposed", "accepted", "acceptance_rate")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RATE_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    requests: int
    proposed: int
    accepted: int
    acceptance_rate: float
    def __init__(self, adapter_version: _Optional[str] = ..., requests: _Optional[int] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance_rate: _Optional[float] = ...) -> None: ...

class StatsSnapshot(_message.Message):
    __slots__ = ("target_model", "draft_model", "adapter_version", "uptime_s", "requests_total", "requests_active", "tokens_total", "acceptance_lifetime", "acceptance_recent", "acceptance_history", "per_adapter", "tokens_per_second_recent", "failure_cases", "pending_cases", "training_state_name", "queue_depth", "rss_bytes", "peak_rss_bytes", "weight_bytes", "blas_name", "version", "default_mode", "prompt_tokens_total", "prompt_tokens_cached", "prompt_cache_bytes", "training_state", "blas", "pid", "failure_store_error", "draft_proposed", "draft_accepted", "history_proposed", "history_accepted", "draft_acceptance_recent", "history_acceptance_recent", "history_tokens", "history_documents", "history_bytes", "auto_train", "auto_train_state", "auto_train_idle_s", "auto_train_min_new_cases", "auto_train_runs", "last_training", "training_slice_max_s", "idle_s", "blas_skinny_rows")
    TARGET_MODEL_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_LIFETIME_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_RECENT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    PER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_RECENT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CASES_FIELD_NUMBER: _ClassVar[int]
    PENDING_CASES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STATE_NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLAS_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_CACHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_STATE_FIELD_NUMBER: _ClassVar[int]
    BLAS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_STORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ACCEPTANCE_RECENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ACCEPTANCE_RECENT_FIELD_NUMBER: _ClassVar[int]
    HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRAIN_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRAIN_STATE_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRAIN_IDLE_S_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRAIN_MIN_NEW_CASES_FIELD_NUMBER: _ClassVar[int]
    AUTO_TRAIN_RUNS_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAINING_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SLICE_MAX_S_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    BLAS_SKINNY_ROWS_FIELD_NUMBER: _ClassVar[int]
    target_model: str
    draft_model: str
    adapter_version: str
    uptime_s: float
    requests_total: int
    requests_active: int
    tokens_total: int
    acceptance_lifetime: float
    acceptance_recent: float
    acceptance_history: _containers.RepeatedScalarFieldContainer[float]
    per_adapter: _containers.RepeatedCompositeFieldContainer[AdapterAcceptance]
    tokens_per_second_recent: float
    failure_cases: int
    pending_cases: int
    training_state_name: str
    queue_depth: int
    rss_bytes: int
    peak_rss_bytes: int
    weight_bytes: int
    blas_name: str
    version: str
    default_mode: Mode
    prompt_tokens_total: int
    prompt_tokens_cached: int
    prompt_cache_bytes: int
    training_state: TrainingState
    blas: Blas
    pid: int
    failure_store_error: str
    draft_proposed: int
    draft_accepted: int
    history_proposed: int
    history_accepted: int
    draft_acceptance_recent: float
    history_acceptance_recent: float
    history_tokens: int
    history_documents: int
    history_bytes: int
    auto_train: bool
    auto_train_state: str
    auto_train_idle_s: float
    auto_train_min_new_cases: int
    auto_train_runs: int
    last_training: LastTraining
    training_slice_max_s: float
    idle_s: float
    blas_skinny_rows: int
    def __init__(self, target_model: _Optional[str] = ..., draft_model: _Optional[str] = ..., adapter_version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., requests_total: _Optional[int] = ..., requests_active: _Optional[int] = ..., tokens_total: _Optional[int] = ..., acceptance_lifetime: _Optional[float] = ..., acceptance_recent: _Optional[float] = ..., acceptance_history: _Optional[_Iterable[float]] = ..., per_adapter: _Optional[_Iterable[_Union[AdapterAcceptance, _Mapping]]] = ..., tokens_per_second_recent: _Optional[float] = ..., failure_cases: _Optional[int] = ..., pending_cases: _Optional[int] = ..., training_state_name: _Optional[str] = ..., queue_depth: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., blas_name: _Optional[str] = ..., version: _Optional[str] = ..., default_mode: _Optional[_Union[Mode, str]] = ..., prompt_tokens_total: _Optional[int] = ..., prompt_tokens_cached: _Optional[int] = ..., prompt_cache_bytes: _Optional[int] = ..., training_state: _Optional[_Union[TrainingState, str]] = ..., blas: _Optional[_Union[Blas, str]] = ..., pid: _Optional[int] = ..., failure_store_error: _Optional[str] = ..., draft_proposed: _Optional[int] = ..., draft_accepted: _Optional[int] = ..., history_proposed: _Optional[int] = ..., history_accepted: _Optional[int] = ..., draft_acceptance_recent: _Optional[float] = ..., history_acceptance_recent: _Optional[float] = ..., history_tokens: _Optional[int] = ..., history_documents: _Optional[int] = ..., history_bytes: _Optional[int] = ..., auto_train: _Optional[bool] = ..., auto_train_state: _Optional[str] = ..., auto_train_idle_s: _Optional[float] = ..., auto_train_min_new_cases: _Optional[int] = ..., auto_train_runs: _Optional[int] = ..., last_training: _Optional[_Union[LastTraining, _Mapping]] = ..., training_slice_max_s: _Optional[float] = ..., idle_s: _Optional[float] = ..., blas_skinny_rows: _Optional[int] = ...) -> None: ...

class LastTraining(_message.Message):
    __slots__ = ("adapter_version", "promoted", "reason", "acceptance_before", "acceptance_after", "duration_s", "finished_at", "trigger")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMOTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    promoted: bool
    reason: str
    acceptance_before: float
    acceptance_after: float
    duration_s: float
    finished_at: float
    trigger: str
    def __init__(self, adapter_version: _Optional[str] = ..., promoted: _Optional[bool] = ..., reason: _Optional[str] = ..., acceptance_before: _Optional[float] = ..., acceptance_after: _Optional[float] = ..., duration_s: _Optional[float] = ..., finished_at: _Optional[float] = ..., trigger: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateAdapterRequest(_message.Message):
    __slots__ = ("version", "rollback", "force")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    version: str
    rollback: bool
    force: bool
    def __init__(self, version: _Optional[str] = ..., rollback: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("version", "active", "parent", "acceptance_before", "acceptance_after", "status_name", "status", "reason", "created_at", "path", "integrity", "metadata_json")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_AFTER_FIELD_NUMBER: _ClassVar[int]
    STATUS_NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    INTEGRITY_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    version: str
    active: bool
    parent: str
    acceptance_before: float
    acceptance_after: float
    status_name: str
    status: AdapterStatus
    reason: str
    created_at: float
    path: str
    integrity: str
    metadata_json: str
    def __init__(self, version: _Optional[str] = ..., active: _Optional[bool] = ..., parent: _Optional[str] = ..., acceptance_before: _Optional[float] = ..., acceptance_after: _Optional[float] = ..., status_name: _Optional[str] = ..., status: _Optional[_Union[AdapterStatus, str]] = ..., reason: _Optional[str] = ..., created_at: _Optional[float] = ..., path: _Optional[str] = ..., integrity: _Optional[str] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "active_version", "adapters_dir")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_DIR_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    active_version: str
    adapters_dir: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., active_version: _Optional[str] = ..., adapters_dir: _Optional[str] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class RollbackAdapterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FailureCase(_message.Message):
    __slots__ = ("id", "created_at", "request_id", "prompt_ids", "completion_ids", "from_draft", "rejection_positions", "proposed", "accepted", "acceptance", "temperature", "top_p", "top_k", "seed", "mode", "finish_reason", "target_id", "draft_id", "adapter_version")
    ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_DRAFT_FIELD_NUMBER: _ClassVar[int]
    REJECTION_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TARGET_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    id: int
    created_at: float
    request_id: str
    prompt_ids: _containers.RepeatedScalarFieldContainer[int]
    completion_ids: _containers.RepeatedScalarFieldContainer[int]
    from_draft: _containers.RepeatedScalarFieldContainer[bool]
    rejection_positions: _containers.RepeatedScalarFieldContainer[int]
    proposed: int
    accepted: int
    acceptance: float
    temperature: float
    top_p: float
    top_k: int
    seed: int
    mode: Mode
    finish_reason: FinishReason
    target_id: str
    draft_id: str
    adapter_version: str
    def __init__(self, id: _Optional[int] = ..., created_at: _Optional[float] = ..., request_id: _Optional[str] = ..., prompt_ids: _Optional[_Iterable[int]] = ..., completion_ids: _Optional[_Iterable[int]] = ..., from_draft: _Optional[_Iterable[bool]] = ..., rejection_positions: _Optional[_Iterable[int]] = ..., proposed: _Optional[int] = ..., accepted: _Optional[int] = ..., acceptance: _Optional[float] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., mode: _Optional[_Union[Mode, str]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., target_id: _Optional[str] = ..., draft_id: _Optional[str] = ..., adapter_version: _Optional[str] = ...) -> None: ...

class ListFailureCasesRequest(_message.Message):
    __slots__ = ("limit", "before_id")
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_ID_FIELD_NUMBER: _ClassVar[int]
    limit: int
    before_id: int
    def __init__(self, limit: _Optional[int] = ..., before_id: _Optional[int] = ...) -> None: ...

class ListFailureCasesResponse(_message.Message):
    __slots__ = ("cases", "total")
    CASES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    cases: _containers.RepeatedCompositeFieldContainer[FailureCase]
    total: int
    def __init__(self, cases: _Optional[_Iterable[_Union[FailureCase, _Mapping]]] = ..., total: _Optional[int] = ...) -> None: ...

class GetFailureCaseRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class ExportFailureCasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetFailureStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdapterCaseCount(_message.Message):
    __slots__ = ("adapter_version", "cases")
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CASES_FIELD_NUMBER: _ClassVar[int]
    adapter_version: str
    cases: int
    def __init__(self, adapter_version: _Optional[str] = ..., cases: _Optional[int] = ...) -> None: ...

class FailureStats(_message.Message):
    __slots__ = ("cases", "pending", "oldest", "newest", "mean_acceptance", "prompt_tokens", "completion_tokens", "per_adapter", "file_bytes", "database_path")
    CASES_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    OLDEST_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIELD_NUMBER: _ClassVar[int]
    MEAN_ACCEPTANCE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATABASE_PATH_FIELD_NUMBER: _ClassVar[int]
    cases: int
    pending: int
    oldest: float
    newest: float
    mean_acceptance: float
    prompt_tokens: int
    completion_tokens: int
    per_adapter: _containers.RepeatedCompositeFieldContainer[AdapterCaseCount]
    file_bytes: int
    database_path: str
    def __init__(self, cases: _Optional[int] = ..., pending: _Optional[int] = ..., oldest: _Optional[float] = ..., newest: _Optional[float] = ..., mean_acceptance: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., per_adapter: _Optional[_Iterable[_Union[AdapterCaseCount, _Mapping]]] = ..., file_bytes: _Optional[int] = ..., database_path: _Optional[str] = ...) -> None: ...

class PurgeFailureCasesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PurgeFailureCasesResponse(_message.Message):
    __slots__ = ("deleted", "history_deleted")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    history_deleted: int
    def __init__(self, deleted: _Optional[int] = ..., history_deleted: _Optional[int] = ...) -> None: ...

class PurgeHistoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PurgeHistoryResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

"""The training service's settings (``DPR_ADMIN_KEY``, ``DPR_JOBS_*``, ``DPR_DATA_ROOT``...), read from
the environment like the service's own (:class:`dpr_service.api.settings.Settings`), behind a cached
getter that tests override by passing their own to ``create_app(..., jobs_settings=...)``.

Everything here is off unless ``DPR_ADMIN_KEY`` is set (and not empty): without it the ``/jobs`` and
``/datasets`` routes answer 404 and no runner starts.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..settings import Settings


class JobSettings(BaseSettings):
    """Training-service settings; each field ``name`` is read from ``DPR_<NAME>``. Sizes in bytes.
    Raises pydantic's ValidationError for a value of the wrong type or out of range."""

    model_config = SettingsConfigDict(env_prefix="DPR_", env_file=None, env_ignore_empty=True, extra="ignore")

    admin_key: SecretStr | None = Field(None, description="turns the training service on: every /jobs and /datasets "
                                        "route needs it as X-Admin-Key (DPR_API_KEY never opens them)")
    jobs_dir: Path = Field(Path("dpr-jobs"), description="state directory: jobs.sqlite and one directory per job")
    data_root: Path = Field(Path("data"), description="data sets, corpora and starting models are named relative to it")
    max_upload_bytes: int = Field(200_000_000, ge=1, description="largest data set upload (a zip: also its unpacked size)")
    jobs_model: str | None = Field(None, description="the starting model when a job names none (a path the operator "
                                   "chose; jobs themselves name models under DPR_DATA_ROOT)")
    jobs_gpus: str | None = Field(None, description="comma-separated CUDA device ids: one job runs on each at a time, "
                                  "or on each group of DPR_JOBS_NPROC of them (unset: one job at a time on the CPU)")
    jobs_nproc: int = Field(1, ge=1, le=64, description="processes per job: above 1, a job is torchrun --standalone "
                            "--nproc-per-node N (data parallel), on N GPUs of DPR_JOBS_GPUS each")
    jobs_poll_s: float = Field(0.5, gt=0, description="how often the runner looks at its jobs")
    jobs_max_validations: int = Field(2, ge=1, le=64, description="POST /jobs checks settings in a child process "
                                      "(~350 MB each: it imports torch); at most this many at once, more get 503")
    jobs_max_queued: int = Field(100, ge=1, le=100_000, description="jobs waiting in the queue at most; a POST /jobs "
                                 "over it gets 429 with Retry-After")
    jobs_max_bytes: int = Field(20_000_000_000, ge=0, description="the jobs directory's size bound: over it the "
                                "oldest finished jobs' weights are removed (never those the index names or a promotion "
                                "uses); 0: no bound")
    jobs_max_streams: int = Field(64, ge=1, le=10_000, description="open GET /jobs/{id}/events streams at most "
                                  "(per worker process); more get 503 with Retry-After")
    jobs_retry_after_s: int = Field(5, ge=1, le=3600, description="Retry-After of the training service's 429 and 503")
    max_zip_entries: int = Field(5000, ge=1, le=1_000_000, description="most entries (files and directories) in "
                                 "an uploaded zip; more is 413 before anything is unpacked")

    @field_validator("admin_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value):
        """An empty key is no key (the service stays off), as DPR_API_KEY's rule."""
        return Settings._empty_key_is_no_key(value)

    @field_validator("jobs_dir", "data_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        """Relative to the server's working directory, made absolute once (job children run elsewhere)."""
        return value.expanduser().resolve()

    @field_validator("jobs_model")
    @classmethod
    def _absolute_if_a_path(cls, value: str | None) -> str | None:
        """A relative path that exists becomes absolute (job children run in their own directory)."""
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    @model_validator(mode="after")
    def _gpus_split_into_jobs(self):
        """DPR_JOBS_GPUS must split into groups of DPR_JOBS_NPROC (checked when the settings are read)."""
        self.slots()
        return self

    @property
    def enabled(self) -> bool:
        """Whether the training service is on (``DPR_ADMIN_KEY`` set)."""
        return self.admin_key is not None

    def slots(self) -> list[str | None]:
        """Where jobs run at once: one slot per group of ``jobs_nproc`` configured GPU ids, in order
        (the slot is the job's CUDA_VISIBLE_DEVICES, e.g. ``"0,1"``), or one CPU slot (None).
        Raises ValueError when the GPU ids do not split into such groups."""
        if not self.jobs_gpus:
            return [None]
        ids = [g.strip() for g in self.jobs_gpus.split(",") if g.strip()]
        if len(ids) % self.jobs_nproc:
            raise ValueError(f"DPR_JOBS_GPUS lists {len(ids)} GPUs, not a multiple of DPR_JOBS_NPROC={self.jobs_nproc}")
        return [",".join(ids[i:i + self.jobs_nproc]) for i in range(0, len(ids), self.jobs_nproc)]


@lru_cache
def get_job_settings() -> JobSettings:
    """The settings from the environment, read once."""
    return JobSettings()

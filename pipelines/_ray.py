"""The one place a pipeline starts (or joins) Ray and sets how rows are grouped into blocks."""

from __future__ import annotations

import pyarrow as pa
import ray
from ray.data import DataContext, Dataset

ONE_ROW_PER_BLOCK = 1  # a row is a whole video, span or clip: worth a task of its own
LARGE_BLOCKS = 128 * 1024 * 1024  # per-frame rows: keep a clip's rows together


def start_ray(num_cpus: int, max_block_bytes: int, preserve_order: bool = False) -> None:
    """Join the running Ray instance (a cluster, or the tests' session) or start a local one.

    ``preserve_order`` keeps rows in input order through every step (a job that streams its
    output straight into a table needs it for byte-identical reruns; jobs that sort in the driver
    do not, and stream a little better without it).
    """
    if not ray.is_initialized():
        # A running cluster (RAY_ADDRESS, which `ray job submit` sets for its entrypoint, or the last
        # `ray start` on this machine) is joined with its own resources: Ray refuses num_cpus there.
        # Ray's own resolver of ray.init()'s address (private API) says which of the two ray.init does.
        joining = ray._private.services.canonicalize_bootstrap_address(None) is not None
        ray.init(num_cpus=None if joining else num_cpus, include_dashboard=False, configure_logging=False)
    ctx = DataContext.get_current()
    ctx.target_max_block_size = max_block_bytes
    ctx.execution_options.preserve_order = preserve_order
    # one progress bar per job (the executor's), not one per operator: readable in `dvc repro` logs
    ctx.enable_operator_progress_bars = False


def one_block_each(tables: list[pa.Table]) -> Dataset:
    """A dataset with each table as one block, as given (a video, a span, a generation task).

    ``ray.data.from_arrow`` would ask a remote task per table for its metadata, in a worker it
    starts for that (bench/curate.py: 1.7 CPU-s and a process of its own for the 90 videos of the
    10x sample, on the same core as the job); these tables are here, so their metadata is read
    here (``from_blocks``).
    """
    return ray.data.from_blocks(tables)

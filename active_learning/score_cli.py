"""``labelloop score``: the champion's probabilities and acquisition scores for a pool of any size, on Ray.

Lives beside the engine it drives (:mod:`active_learning.batch_score`) rather than in ``labelloop/``,
because it reaches the loop's queue push, and the data layer imports nothing downstream of it; the
composition point, ``labelloop/cli.py``, registers it.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from labelloop.cli_errors import friendly_errors
from labelloop.config import get_settings

console = Console()

RAY_ADDRESS_HELP = (
    "an existing Ray cluster, e.g. ray://head-node:10001 (Ray Client) or auto (a cluster this machine is part "
    "of: `ray start --head` on the head node, `ray start --address=HEAD:6379` on each worker, with this "
    "package and its settings installed on every node). Default: a local Ray on this machine's CPUs, shut "
    "down at the end")


@friendly_errors
def score(
    pool: Annotated[list[str], typer.Option("--pool", help="Parquet/CSV/JSONL files or directories of them (repeat "
                                            "for several); a pyarrow URI such as s3://bucket/pool/ or gs://... "
                                            "is read by Ray Data too (object storage is untested here)")],
    out: Annotated[str, typer.Option(help="the scored pool, one Parquet file: id, text_sha1, task_id (when the "
                                     "pool has one), p_<label> per label, predicted, model_version, score")] = (
        "scores.parquet"),
    strategy: Annotated[str | None, typer.Option(help="acquisition score (default: the strategy setting, a k-means one "
                                                 "ranking by its base score); per-item "
                                                 "strategies only: margin, entropy, least_confidence, "
                                                 "mean/max_binary_entropy, random, class_balanced:, mixed:, "
                                                 "severity_weighted: over those. k-means, BADGE, BALD and "
                                                 "cardinality need the whole pool at once and are refused")] = None,
    push_top: Annotated[int, typer.Option(help="push the top K unlabeled items (by the strategy) to the Label "
                                          "Studio project's queue as review priorities, in bulk", min=0)] = 0,
    project: Annotated[int | None, typer.Option("--project", help="Label Studio project for --push-top "
                                                "(default: settings)")] = None,
    ray_address: Annotated[str | None, typer.Option(help=RAY_ADDRESS_HELP)] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all of this machine's)",
                                                 min=1)] = None,
    actors: Annotated[int | None, typer.Option(help="scoring actors, each loading the champion once (default: one "
                                               "per GPU when the cluster has GPUs, else 1 using every CPU)",
                                               min=1)] = None,
    batch_size: Annotated[int, typer.Option(help="texts per Ray batch sent to an actor", min=1)] = 1024,
    text_column: Annotated[str, typer.Option(help="the pool's text column")] = "text",
    id_column: Annotated[str | None, typer.Option(help="the pool's item id column (default: id, else "
                                                  "item_id)")] = None,
    taxonomy: Annotated[str | None, typer.Option(help="taxonomy whose champion scores (default: settings)")] = None,
) -> None:
    """Score a pool with the registry's champion on Ray Data and write the scores as Parquet.

    One actor per GPU when the cluster has GPUs, else CPU actors. A failed run leaves no output file.

    On an existing cluster, from one of its nodes (untested here: one machine, no GPU, no object storage):

    labelloop score --ray-address auto --pool s3://bucket/pool/ --out s3://bucket/scores.parquet --push-top 1000
    """
    from active_learning.batch_score import QueuePush, score_pool
    from labelloop.cli import _loop
    from labelloop.taxonomy import taxonomy_setting

    settings = get_settings()
    if taxonomy:
        settings = settings.model_copy(update={"taxonomy": taxonomy_setting(taxonomy)})
    queue = QueuePush(_loop(settings, project)) if push_top else None
    try:
        with console.status("scoring the pool on Ray"):
            result = score_pool(settings, pool, out, strategy=strategy, batch_size=batch_size, actors=actors,
                                ray_address=ray_address, num_cpus=num_cpus, text_column=text_column,
                                id_column=id_column, push_top=push_top, queue=queue)
    finally:
        if queue is not None:
            queue.loop.journal.close()
    # a small pool is all start-up: "0 texts/s" would read as if nothing was scored
    rate = result.texts_per_second
    rate_text = f"{rate:,.0f} texts/s" if rate >= 10 else f"{rate:.2g} texts/s including start-up"
    console.print(f"scored {result.rows:,} texts with {result.model_version} in {result.seconds:.1f} s "
                  f"({rate_text}, {result.actors} actor(s)"
                  f"{', 1 GPU each' if result.gpus_per_actor else ', CPU'}); strategy {result.strategy}; "
                  f"wrote {result.out}")
    if result.note:
        console.print(f"note: {result.note}")
    if push_top:
        console.print(f"pushed {result.pushed} of the top {len(result.top)} priorities to project "
                      f"{queue.project_id}")


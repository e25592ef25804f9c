"""One process of the 2-process run of `test_distributed.py` (not a test module).

Usage: python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OUT.npz
Every process builds the same synthetic stream, joins the JAX runtime over loopback with CPU
collectives (gloo), and runs `run_continual` on the global mesh, feeding only its own rows of
each batch. Process 0 saves the accuracy matrix and head parameters to OUT.npz.
"""

import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before initialize


def main(process_id: int, num_processes: int, port: int, workdir: str, out: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    import numpy as np  # noqa: PLC0415

    from calfuse_jax.continual import run_continual  # noqa: PLC0415
    from tests.test_distributed import shared_config, shared_stream  # noqa: PLC0415

    assert jax.process_count() == num_processes, jax.process_count()
    stream, text = shared_stream()
    result = run_continual(stream, text, shared_config(), workdir, progress=False)
    if jax.process_index() == 0:
        leaves = {f"param_{i}": leaf for i, leaf in enumerate(jax.tree.leaves(result.params))}
        np.savez(out, accuracy=result.accuracy_matrix, devices=jax.device_count(), **leaves)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, count, port = (int(a) for a in sys.argv[1:4])
    main(pid, count, port, sys.argv[4], sys.argv[5])

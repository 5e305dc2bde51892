"""arcdiff: dual-head diffusion models (x0 and eps on a quarter circle) served over HTTP.

Subpackages, in the direction of their imports:

    arcdiff.model     the method: schedule, network, loss, solvers, model format, training, eval
    arcdiff.worker    the continuous-batching engine and the RQ worker around it
    arcdiff.contract  what travels between the API and the workers (job spec, queues, results)
    arcdiff.service   the FastAPI app (HTTP API, playground, metrics)
    arcdiff.client    a small HTTP client (no torch)
    arcdiff.bench     benchmarks
    arcdiff.cli       the `arcdiff` command line
"""

__version__ = "0.1.0"

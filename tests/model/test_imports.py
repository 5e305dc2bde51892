import subprocess
import sys


def test_model_imports_no_web_or_queue_package():
    code = (
        "import sys, arcdiff.model, arcdiff.model.solvers, arcdiff.model.registry, arcdiff.model.loss, "
        "arcdiff.model.format, arcdiff.model.unet;"
        "web = {'fastapi','starlette','uvicorn','redis','rq','httpx','prometheus_client'};"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in web);"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, f"model imports web/queue packages: {r.stdout} {r.stderr}"

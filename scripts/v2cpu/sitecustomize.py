"""Make vLLM's CPU build believe Triton has a CPU backend, so it picks Model Runner V2;
with TRITON_INTERPRET=1 every Triton kernel then runs in Triton's interpreter (numpy)."""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        import triton.backends as _tb

        if "cpu" not in _tb.backends:
            _any = next(iter(_tb.backends.values()))
            _tb.backends["cpu"] = _tb.Backend(compiler=_any.compiler, driver=_any.driver)
    except Exception as e:  # pragma: no cover
        print("sitecustomize: no fake triton cpu backend:", e)

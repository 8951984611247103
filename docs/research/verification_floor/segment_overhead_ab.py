"""Seven compiled segments: as committed (one shared code object: 14 dynamo cache entries on it) vs each segment with
its own code object (2 entries each) vs the committed ones with dynamo's guard evaluation skipped; one segment as
the reference. Interleaved, one process, 2 threads."""
import json, statistics, time, types
import torch
torch.set_num_threads(2)
from lede.drafters.loading import load_model
from lede.core.engine import Decoder
from lede.core import compiled as C
from lede.core.policy import Autoregressive
from lede.data import DEFAULT_DATA_DIR, prompt_pool

class OwnCode(C._Segment):
    def __init__(self, fast, a, b):
        super().__init__(fast, a, b)
        f = C._Segment.forward
        code = f.__code__.replace(co_name=f"forward_{a}_{b}")
        self.forward = types.MethodType(types.FunctionType(code, f.__globals__, f"forward_{a}_{b}", f.__defaults__, f.__closure__), self)

class OwnLayers(C.CompiledLayers):
    def __init__(self, fast, cuts=()):
        super().__init__(fast, cuts)
        self.segments = [(a, b, torch.compile(OwnCode(fast, a, b), dynamic=True)) for a, b in zip(self.cuts, self.cuts[1:])]

lm = load_model("smollm2-135m", kernels="auto", compiled=False)
eager = lm.fast_layers
CUTS = [2, 4, 6, 8, 12, 18]
variants = {}
for name, make in (("one", lambda: C.CompiledLayers(eager, [])), ("seven", lambda: C.CompiledLayers(eager, CUTS)),
                   ("seven_own", lambda: OwnLayers(eager, CUTS))):
    cl = make()
    print(name, "compile s", round(cl.warm(lm.hidden_size, lm.dtype, lm.device), 1), "graphs", cl.graphs, flush=True)
    variants[name] = cl
variants["seven_noguard"] = variants["seven"]
dec = Decoder(lm)
ids = torch.randint(0, 49152, (400,), generator=torch.Generator().manual_seed(0)).tolist()
res = {}
def ctx(name):
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True) if name == "seven_noguard" else torch.inference_mode()
with torch.inference_mode():
    cache = dec.new_cache(300); lm.fast_layers = eager; dec.prefill(ids[:256], cache)
    for rep in range(15):
        for t in (1, 2, 5):
            for name, cl in variants.items():
                lm.fast_layers = cl
                with ctx(name):
                    dec.verify(ids[256:256 + t], None, cache); cache.crop(256); xs = []
                    for _ in range(3):
                        s = time.perf_counter(); dec.verify(ids[256:256 + t], None, cache); xs.append(time.perf_counter() - s); cache.crop(256)
                res.setdefault(f"verify{t}/{name}", []).append(statistics.median(xs) * 1e3)
        for name, cl in variants.items():
            lm.fast_layers = cl; xs = []
            with ctx(name):
                for _ in range(4):
                    s = time.perf_counter(); dec.draft_step(ids[256], 2, cache); xs.append(time.perf_counter() - s); cache.crop(256, range(2))
            res.setdefault(f"draftL2/{name}", []).append(statistics.median(xs) * 1e3)
        print("rep", rep, time.strftime("%X"), flush=True)
for key in sorted({k.split("/")[0] for k in res}):
    base = res[f"{key}/one"]
    print(f"{key:8s} one {statistics.median(base):6.2f} | " + " | ".join(
        f"{n} {statistics.median(res[f'{key}/{n}']):6.2f} ({statistics.median([y/x for x, y in zip(base, res[f'{key}/{n}'])]):.3f})"
        for n in variants if n != "one"))
json.dump(res, open("/tmp/s8/seg_ab2.json", "w"))

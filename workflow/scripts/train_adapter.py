"""Rule train_adapter: one exit adapter (layer, design) on the training distillation data."""

import logging

from lede.study import load_lm, setup

p = setup(snakemake)  # noqa: F821
from dataclasses import asdict  # noqa: E402

from lede.drafters.adapters import exit_agreement, train_adapter  # noqa: E402
from lede.drafters.distill import load_distill, top_vocab  # noqa: E402
from lede.core.exits import AdapterFile, save_adapter  # noqa: E402

layer, design = int(snakemake.wildcards.layer), snakemake.wildcards.design  # noqa: F821
seqs, data, meta = load_distill(snakemake.input.data)  # noqa: F821
lm = load_lm(p, device="cpu")  # training runs on CPU copies of norm + head
vocab = top_vocab(seqs, p.vocab_size) if 0 < p.vocab_size < lm.config.vocab_size else None
options = {"rank": p.rank} if design == "lowrank" else {}
meta_options = options | ({"init": p.decoder["init"]} if design == "decoder" else {})  # recorded, not needed to load
epochs, lr = (p.decoder["epochs"], p.decoder["lr"]) if design == "decoder" else (p.epochs, p.lr)
adapter, log = train_adapter(lm, data, layer, design, vocab=vocab, loss=p.loss, epochs=epochs, lr=lr, seed=p.seed,
                             sequences=seqs, batch_tokens=p.decoder["batch_tokens"], init=p.decoder["init"], **options)
agree = float(exit_agreement(lm, data, layer, adapter, vocab, sequences=seqs).float().mean())
logging.info("layer %d %s: train agreement %.4f, losses %s, %.1f s", layer, design, agree, log.epoch_loss, log.seconds)
save_adapter(snakemake.output[0], adapter, AdapterFile(  # noqa: F821
    model=p.model, layer=layer, hidden_size=lm.hidden_size, design=design, options=meta_options,
    data_hash=meta["data_hash"], metrics=asdict(log) | {"train_agreement": agree}), vocab=vocab)

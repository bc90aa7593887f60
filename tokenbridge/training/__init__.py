"""Trainers of the models the generators build on, apart from the models (which import no data, cache or trainer
module): `training.vae.train_vae` (the embedded Fashion-MNIST VAE), `training.vq.train_vq` (D2C's VQ tokenizer
of VAE latents) and `training.classifier.train_classifier` (the evaluation classifier). The generators' own
trainer is `tokenbridge.train`; all of them optimise with `tokenbridge.optim.ScheduledAdamW`."""

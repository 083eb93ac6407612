"""The jobs the controller launches: run config, fine-tune, refresh, bulk inference (materialize) and gates."""

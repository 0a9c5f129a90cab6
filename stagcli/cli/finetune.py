"""`stag finetune`: not built yet (this module registers its command on `app` once it exists)."""

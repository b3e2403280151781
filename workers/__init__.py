"""Workers: dataset decoding, frozen backbones, embedding extraction (and the Celery tasks).

The work lives in plain functions that tests call directly; the Celery side stays thin:
- workers.backbones: the catalogue, where weights come from, load_backbone;
- workers.datasets: open_dataset / validate_dataset for ImageFolder and CSV-manifest archives;
- workers.preprocessing: timm's eval transform, batched (resize, crop, normalise);
- workers.extract: extract (cached by content hash) and embed_images (online prediction);
- workers.cli: `cvxtune embed`.
"""

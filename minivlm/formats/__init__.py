"""Where records and images come from: LLaVA JSON + folder, Parquet, WebDataset tars, URLs."""

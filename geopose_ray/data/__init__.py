"""Data layer: DrivenData layout, file I/O, conversion cache, folds, torch dataset."""

"""Session backends (boxlite, local, external) behind one small interface."""

"""Thin glue between statevault and training frameworks (Keras callback, TF state views)."""

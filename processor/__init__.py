"""The data side of meterdrop: recognise a delivered file, parse it with polars, and
write it into DuckDB with newest-delivery-wins semantics.  Knows nothing about sockets."""

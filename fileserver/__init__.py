"""The network side of meterdrop: SFTP and FTPS servers that publish a file under its final
name only once its upload completed.  Knows nothing about CSV or DuckDB."""

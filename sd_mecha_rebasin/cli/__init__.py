"""The `sd-rebasin` command line: commands and printing (`commands`), the file-to-file jobs they
run (`jobs`, `many_job`), progress display and the demo."""

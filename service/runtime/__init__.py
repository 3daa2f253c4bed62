"""The running process: settings, lifecycle (load, warm, drain, stop), metrics, logs, `csist serve`."""

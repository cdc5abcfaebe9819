"""Task data: GLUE tasks from a local folder or the hub, and custom TSV/CSV/JSONL files."""

from exitrl.data.loading import DATA_DIR_ENV, DataError, TaskData, load_task, read_texts, select_rows
from exitrl.data.tasks import GLUE_TASKS, TASK_NAMES, TaskSpec

__all__ = ["DATA_DIR_ENV", "DataError", "GLUE_TASKS", "TASK_NAMES", "TaskData", "TaskSpec", "load_task", "read_texts",
           "select_rows"]

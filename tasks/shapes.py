from gpg_vl.task import Task
class ShapesTask(Task):
    name = "shapes"

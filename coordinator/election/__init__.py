"""Leader election: lease data, the fencing token and :class:`LeaderElector`."""

from coordinator.election.elector import LeaderElector
from coordinator.election.lease import LeaderInfo, Term, read_leader

__all__ = ["LeaderElector", "LeaderInfo", "Term", "read_leader"]

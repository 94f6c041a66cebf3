"""vpr_rerank_ros: visual localisation with NetVLAD retrieval and GNN re-ranking with positional affinity.

The core (geo, metrics, mapdb, ...) imports no ROS; the rclpy node and the CLIs are thin edges over it.
"""
__version__ = "0.1.0"

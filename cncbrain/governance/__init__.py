"""What the services share of governance: the quota and placement-policy check (`policy`, pure, with
the JSON form governance projects into KV `cnc-governance`) and the gate that follows that
projection to check placements in-process and calls governance to admit workloads (`gate`).
Governance itself (`services.governance`) writes the projection; the scheduler and adaptation
read it through the gate."""

"""Serving Postfix: the socketmap codec, our policy as ``smtp_tls_policy_maps`` answers,
and the ``mta policy-server`` process that speaks it."""

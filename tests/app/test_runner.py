"""app.runner: helpers of one run."""

import torch


def test_weights_fingerprint_is_equal_only_for_equal_starting_weights():
    """The soup's precondition: equal for the same weights, different for any changed value,
    dtype or name."""
    from trainwell.app.runner import weights_fingerprint

    def net(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    assert weights_fingerprint(net(0)) == weights_fingerprint(net(0))
    assert weights_fingerprint(net(0)) != weights_fingerprint(net(1))
    nudged = net(0)
    with torch.no_grad():
        nudged[0].weight[0, 0] += 1e-7
    assert weights_fingerprint(nudged) != weights_fingerprint(net(0))
    assert weights_fingerprint(net(0).double()) != weights_fingerprint(net(0))

"""The plain-torch projection P(D) = (I − UUᵀ) D (I − VVᵀ): the reference every kernel is tested against."""

import pytest
import torch

from offprincipal.projection import principal_leak, project, project_list


def _orthonormal(n, k, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=dtype)).Q


def _explicit(D, U, V, sides):
    """Dense projector matrices, fp64: the definition itself."""
    m, n = D.shape
    L = torch.eye(m, dtype=torch.float64) - U @ U.T if sides in ("both", "left") else torch.eye(m, dtype=torch.float64)
    R = torch.eye(n, dtype=torch.float64) - V @ V.T if sides in ("both", "right") else torch.eye(n, dtype=torch.float64)
    return L @ D.double() @ R


@pytest.mark.parametrize("shape,k", [((17, 9), 1), ((9, 17), 4), ((33, 31), 30), ((64, 5), 4)])
@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_matches_dense_projector(shape, k, sides):
    m, n = shape
    U, V = _orthonormal(m, k, 1), _orthonormal(n, k, 2)
    D = torch.randn(m, n, dtype=torch.float64)
    got = project(D, U, V, sides)
    torch.testing.assert_close(got, _explicit(D, U, V, sides), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_dtypes_keep_dtype_and_compute_in_fp32(dtype, atol):
    U, V = _orthonormal(40, 6, 3).float(), _orthonormal(24, 6, 4).float()
    D = torch.randn(40, 24).to(dtype)
    got = project(D, U, V)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), _explicit(D, U.double(), V.double(), "both"), rtol=0, atol=atol)


def test_idempotent_and_orthogonal():
    U, V = _orthonormal(30, 5, 5), _orthonormal(20, 5, 6)
    P = project(torch.randn(30, 20, dtype=torch.float64), U, V)
    torch.testing.assert_close(project(P, U, V), P, rtol=0, atol=1e-12)
    left, right = principal_leak(P, U, V)
    assert left < 1e-13 and right < 1e-13


def test_leak_of_principal_update_is_one():
    U, V = _orthonormal(30, 5, 5), _orthonormal(20, 5, 6)
    D = U @ torch.randn(5, 5, dtype=torch.float64) @ V.T
    left, right = principal_leak(D, U, V)
    assert left == pytest.approx(1.0) and right == pytest.approx(1.0)
    assert principal_leak(torch.zeros(30, 20), U, V) == (0.0, 0.0)


def test_project_list_and_errors():
    Us = [_orthonormal(10, 2, i) for i in range(3)]
    Vs = [_orthonormal(7, 2, 10 + i) for i in range(3)]
    Ds = [torch.randn(10, 7, dtype=torch.float64) for _ in range(3)]
    for got, D, U, V in zip(project_list(Ds, Us, Vs), Ds, Us, Vs):
        torch.testing.assert_close(got, project(D, U, V))
    with pytest.raises(ValueError, match="equal length"):
        project_list(Ds, Us[:2], Vs)
    with pytest.raises(ValueError, match="sides must be one of"):
        project(Ds[0], Us[0], Vs[0], "middle")


def test_autograd_gradient_is_projected():
    U, V = _orthonormal(12, 3, 7), _orthonormal(8, 3, 8)
    D = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    G = torch.randn(12, 8, dtype=torch.float64)
    (project(D, U, V) * G).sum().backward()
    torch.testing.assert_close(D.grad, project(G, U, V))  # P is symmetric


@pytest.mark.parametrize("sides", ["both", "left", "right"])
def test_repeated_projection_gradient(sides):
    from offprincipal.projection import project_repeated

    U, V = _orthonormal(12, 3, 7), _orthonormal(8, 3, 8)
    D = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    G = torch.randn(12, 8, dtype=torch.float64)
    out = project_repeated(D, U, V, sides, passes=2)
    torch.testing.assert_close(out, project(project(D, U, V, sides), U, V, sides))
    (out * G).sum().backward()
    torch.testing.assert_close(D.grad, project(project(G, U, V, sides), U, V, sides))
    assert torch.autograd.gradcheck(lambda d: project_repeated(d, U, V, sides), (D.detach().clone().requires_grad_(),))

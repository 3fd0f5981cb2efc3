"""The global Sim(3) solve: per connected component of accepted edges, cluster -> world transforms.

A maximum-weight spanning tree (weight = inliers) gives the initial transforms; a Sim(3) pose graph over *all*
accepted edges (Levenberg-Marquardt on Lie-algebra residuals, translation relative to the cluster's length) then
spreads loop-closure errors instead of leaving them on the last tree edge. Components are ranked by core images
(0 = largest); each has its own world frame, rooted at its cluster with the most core images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.sparse.csgraph import breadth_first_order, connected_components, minimum_spanning_tree

from ..config import MergeConfig
from ..geometry import sim3_exp, sim3_inverse, sim3_log, sim3_parts
from .clusters import ClusterData


def align_components(
    clusters: dict[int, ClusterData], order: list[int], pair_nodes: np.ndarray, meas: np.ndarray,
    accepted: np.ndarray, edge_w: np.ndarray, lengths: np.ndarray, cfg: MergeConfig,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Components of the accepted edges and their transforms.

    Returns (number of components, component per node, spanning-tree transforms, final transforms, one pose-graph
    report per component); node ``i`` is cluster ``order[i]``, ``X_world = T[i] @ X_cluster``.
    """
    C = len(order)
    acc_pairs = pair_nodes[accepted]
    adj = sp.coo_matrix((np.ones(len(acc_pairs)), (acc_pairs[:, 0], acc_pairs[:, 1])), shape=(C, C))
    ncomp, label = connected_components(adj + adj.T, directed=False)
    n_core = np.array([int(clusters[c].core.sum()) for c in order])
    comp_size = np.bincount(label, weights=n_core, minlength=ncomp)
    rank = np.empty(ncomp, np.int64)
    rank[np.lexsort((np.arange(ncomp), -comp_size))] = np.arange(ncomp)
    comp = rank[label]
    T_init = np.tile(np.eye(4), (C, 1, 1))
    T = np.tile(np.eye(4), (C, 1, 1))
    pg_info: list[dict[str, Any]] = []
    for k in range(ncomp):
        nodes = np.flatnonzero(comp == k)
        local = {int(nd): j for j, nd in enumerate(nodes)}
        m = accepted & np.isin(pair_nodes[:, 0], nodes)
        lp = np.array([[local[int(x)] for x in p] for p in pair_nodes[m]], np.int64).reshape(-1, 2)
        root = int(np.argmax(n_core[nodes] * 1.0 - 1e-9 * np.arange(len(nodes))))
        Ti = spanning_tree_init(len(nodes), lp, meas[m], edge_w[m], root) if len(lp) else np.tile(np.eye(4), (1, 1, 1))
        T_init[nodes] = Ti
        if cfg.optimize and len(lp) >= len(nodes):  # a loop exists: the pose graph can change something
            ew = np.ones(len(lp))
            To, info = pose_graph(Ti, lp, meas[m], lengths[nodes], ew, root, cfg.max_iterations)
        else:
            To, info = Ti, {"edges": int(len(lp)), "nodes": int(len(nodes)), "iterations": 0,
                            "note": "tree only" if len(lp) < len(nodes) else "optimisation disabled"}
        T[nodes] = To
        info["component"] = int(k)
        pg_info.append(info)
    return ncomp, comp, T_init, T, pg_info


def loop_residuals(T: np.ndarray, pair_nodes: np.ndarray, meas: np.ndarray, accepted: np.ndarray,
                   lengths: np.ndarray, edge_info: list[dict[str, Any]]) -> None:
    """How well the global solve closed each accepted edge, added to its ``edge_info``: rotation (degrees),
    translation relative to cluster b's length, log scale."""
    for e in np.flatnonzero(accepted):
        a, b = pair_nodes[e]
        D = sim3_inverse(meas[e]) @ sim3_inverse(T[a]) @ T[b]
        xi = sim3_log(D)
        edge_info[e]["global_rot_deg"] = float(np.degrees(np.linalg.norm(xi[3:6])))
        edge_info[e]["global_trans_rel"] = float(np.linalg.norm(xi[:3]) / lengths[b])
        edge_info[e]["global_log_scale"] = float(xi[6])


def spanning_tree_init(n: int, pairs: np.ndarray, meas: np.ndarray, weight: np.ndarray, root: int) -> np.ndarray:
    """Node -> world transforms (n,4,4) from the maximum-weight spanning tree (root = identity).

    ``pairs`` (E,2) node indices, ``meas`` (E,4,4) with X_a = meas X_b. All nodes must be connected.
    """
    wmax = float(weight.max()) if len(weight) else 1.0
    cost = (wmax + 1.0) - weight  # positive; larger weight -> cheaper
    G = sp.coo_matrix((cost, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    tree = minimum_spanning_tree(G + G.T)
    tree = tree + tree.T
    order, pred = breadth_first_order(tree, root, directed=False, return_predecessors=True)
    lookup = {(int(a), int(b)): e for e, (a, b) in enumerate(pairs)}
    T = np.tile(np.eye(4), (n, 1, 1))
    for node in order[1:]:
        p = int(pred[node])
        if (p, int(node)) in lookup:  # X_p = S X_node
            T[node] = T[p] @ meas[lookup[(p, int(node))]]
        else:
            T[node] = T[p] @ sim3_inverse(meas[lookup[(int(node), p)]])
    return T


def _edge_residuals(T: np.ndarray, pairs: np.ndarray, meas_inv: np.ndarray, length_b: np.ndarray,
                    sqrt_w: np.ndarray) -> np.ndarray:
    """(E,7): sqrt(w) * log(S_ab^-1 T_a^-1 T_b), translation divided by the length of cluster b."""
    return _residual_pairs(T[pairs[:, 0]], T[pairs[:, 1]], meas_inv, length_b, sqrt_w)


def pose_graph(
    T0: np.ndarray, pairs: np.ndarray, meas: np.ndarray, length: np.ndarray, weight: np.ndarray, root: int,
    max_iterations: int = 50,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Levenberg-Marquardt over node transforms (right perturbations ``T exp(d)``), root fixed (gauge).

    Every edge contributes a 7-vector residual; the Jacobian blocks are central differences of the batched
    residual (each edge depends on two nodes), assembled sparse, and the damped normal equations are solved with
    a sparse direct solver, so the cost per iteration grows with the number of edges.
    """
    n, E = len(T0), len(pairs)
    T = T0.copy()
    meas_inv = sim3_inverse(meas)
    lb = length[pairs[:, 1]]
    sw = np.sqrt(weight)
    free = np.ones(n, bool)
    free[root] = False
    col_of = np.full(n, -1)
    col_of[free] = np.arange(int(free.sum()))
    nv = 7 * int(free.sum())
    r = _edge_residuals(T, pairs, meas_inv, lb, sw)
    cost0 = cost = 0.5 * float((r**2).sum())
    info: dict[str, Any] = {"edges": int(E), "nodes": int(n), "cost_initial": cost0, "iterations": 0}
    if E == 0 or nv == 0:
        info["cost_final"] = cost
        return T, info
    lam, h = 1e-4, 1e-6
    rows_e = np.arange(E)
    for it in range(max_iterations):
        blocks = []  # (E,7,7) per side: d residual / d perturbation of that side's node
        Ta, Tb = T[pairs[:, 0]], T[pairs[:, 1]]
        for side in (0, 1):
            J = np.empty((E, 7, 7))
            for k in range(7):
                d = np.zeros(7)
                d[k] = h
                if side == 0:
                    rp = _residual_pairs(Ta @ sim3_exp(d), Tb, meas_inv, lb, sw)
                    rm = _residual_pairs(Ta @ sim3_exp(-d), Tb, meas_inv, lb, sw)
                else:
                    rp = _residual_pairs(Ta, Tb @ sim3_exp(d), meas_inv, lb, sw)
                    rm = _residual_pairs(Ta, Tb @ sim3_exp(-d), meas_inv, lb, sw)
                J[:, :, k] = (rp - rm) / (2 * h)
            blocks.append(J)
        rr, cc, vv = [], [], []
        for side in (0, 1):
            nodes = pairs[:, side]
            keep = free[nodes]
            e_idx, n_idx = rows_e[keep], col_of[nodes[keep]]
            J = blocks[side][keep]
            ri = (7 * e_idx)[:, None, None] + np.arange(7)[None, :, None]
            ci = (7 * n_idx)[:, None, None] + np.arange(7)[None, None, :]
            rr.append(np.broadcast_to(ri, J.shape).ravel())
            cc.append(np.broadcast_to(ci, J.shape).ravel())
            vv.append(J.ravel())
        Jm = sp.csr_matrix((np.concatenate(vv), (np.concatenate(rr), np.concatenate(cc))), shape=(7 * E, nv))
        g = Jm.T @ r.ravel()
        Hm = (Jm.T @ Jm).tocsc()
        diag = Hm.diagonal()
        improved = False
        for _ in range(10):
            A = Hm + sp.diags(lam * np.maximum(diag, 1e-9), format="csc")
            step = spla.spsolve(A, -g)
            if not np.isfinite(step).all():
                lam *= 10
                continue
            Tn = T.copy()
            Tn[free] = T[free] @ sim3_exp(step.reshape(-1, 7))
            rn = _edge_residuals(Tn, pairs, meas_inv, lb, sw)
            cn = 0.5 * float((rn**2).sum())
            if cn < cost:
                improved = True
                rel = (cost - cn) / max(cost, 1e-300)
                T, r, cost = Tn, rn, cn
                lam = max(lam / 3.0, 1e-9)
                break
            lam *= 4.0
        info["iterations"] = it + 1
        if not improved or rel < 1e-10 or float(np.abs(step).max()) < 1e-12:
            break
    info["cost_final"] = cost
    return T, info


def _residual_pairs(Ta: np.ndarray, Tb: np.ndarray, meas_inv: np.ndarray, lb: np.ndarray, sw: np.ndarray) -> np.ndarray:
    D = meas_inv @ sim3_inverse(Ta) @ Tb
    xi = sim3_log(D)
    xi[:, :3] /= lb[:, None]
    return xi * sw[:, None]


def global_extrinsics(T: np.ndarray, ext: np.ndarray) -> np.ndarray:
    """Camera extrinsics (n,3,4) of one cluster -> extrinsics in the world of cluster->world ``T`` (4,4).

    X_c = T^-1 X_w; camera coords scaled by s so the camera stays rigid: R_w = R R_T^T, t_w = s t - R_w t_T.
    """
    s, RT, tT = sim3_parts(T)
    R = ext[:, :, :3] @ RT.T
    t = s * ext[:, :, 3] - (R @ tT[:, None])[..., 0]
    return np.concatenate([R, t[..., None]], -1)

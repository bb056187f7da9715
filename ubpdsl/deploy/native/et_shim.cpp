// ExecuTorch kernel library for ubpdsl's channel-major subgraph operator.
//
// Registers `ubpdsl::subgraph.out(Tensor x, int plan_id, *, Tensor(a!) out) -> Tensor(a!)`
// with ExecuTorch's operator registry (EXECUTORCH_LIBRARY, at load time). The operator runs a plan
// (see ubp_model.c) that the application registers once under `plan_id` with
// ubp_et_register_plan(): the plan blob (folded weights, packed sparse weights, bound kernels)
// and its workspace, both owned by the application. No allocation per call; one workspace per
// plan, so a plan must not run on two threads at once.
#include <cstdint>

#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>

extern "C" {
int32_t ubp_model_run(const void *plan, const float *x, float *y, void *workspace);
int32_t ubp_model_shape(const void *plan, int64_t *shape);
}

namespace {

constexpr int64_t kMaxPlans = 64;

struct PlanEntry {
  const void *plan = nullptr;
  void *workspace = nullptr;
  int64_t shape[5] = {0, 0, 0, 0, 0};  // B, C_in, H, W, C_out
};

PlanEntry g_plans[kMaxPlans];

using executorch::aten::ScalarType;
using executorch::aten::SizesType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

Tensor &subgraph_out(KernelRuntimeContext &ctx, const Tensor &x, int64_t plan_id, Tensor &out) {
  ET_KERNEL_CHECK_MSG(ctx, plan_id >= 0 && plan_id < kMaxPlans && g_plans[plan_id].plan != nullptr,
                      InvalidArgument, out, "ubpdsl::subgraph: plan %lld is not registered",
                      static_cast<long long>(plan_id));
  const PlanEntry &e = g_plans[plan_id];
  ET_KERNEL_CHECK_MSG(ctx, x.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float,
                      InvalidArgument, out, "ubpdsl::subgraph: float32 tensors only");
  ET_KERNEL_CHECK_MSG(ctx, x.dim() == 4 && x.size(0) == e.shape[0] && x.size(1) == e.shape[1] &&
                               x.size(2) == e.shape[2] && x.size(3) == e.shape[3],
                      InvalidArgument, out, "ubpdsl::subgraph: input shape does not match plan %lld",
                      static_cast<long long>(plan_id));
  ET_KERNEL_CHECK_MSG(ctx, executorch::runtime::tensor_is_default_dim_order(x), InvalidArgument, out,
                      "ubpdsl::subgraph: input must be contiguous NCHW");
  const SizesType sizes[2] = {static_cast<SizesType>(e.shape[0]), static_cast<SizesType>(e.shape[4])};
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, {sizes, 2}) == Error::Ok, InvalidArgument, out);
  const int32_t rc = ubp_model_run(e.plan, x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), e.workspace);
  ET_KERNEL_CHECK_MSG(ctx, rc == 0, Internal, out, "ubpdsl::subgraph: ubp_model_run returned %d", rc);
  return out;
}

}  // namespace

extern "C" {
// 0 ok; 1 bad id; 2 the blob is not a plan. A NULL plan unregisters `id`.
int32_t ubp_et_register_plan(int64_t id, const void *plan, void *workspace) {
  if (id < 0 || id >= kMaxPlans) return 1;
  if (plan == nullptr) {
    g_plans[id] = PlanEntry{};
    return 0;
  }
  PlanEntry e;
  if (ubp_model_shape(plan, e.shape) != 0) return 2;
  e.plan = plan;
  e.workspace = workspace;
  g_plans[id] = e;
  return 0;
}
}

EXECUTORCH_LIBRARY(ubpdsl, "subgraph.out", subgraph_out);
